import sys

from rec_pipelines.cli import main

sys.exit(main())
