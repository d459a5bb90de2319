"""`python -m batch ...` = `kronos-batch ...`; also the script to hand to `spark-submit`
(`spark-submit --master URL .../batch/__main__.py INPUT OUTPUT ...`)."""

import sys

from batch.cli import main

sys.exit(main())
