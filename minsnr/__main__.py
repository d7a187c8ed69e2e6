import sys

from minsnr.cli import main

sys.exit(main())
