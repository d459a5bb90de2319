"""Load tests of the Kronos server: Locust users (`locustfile.py`), payloads, the soak."""
