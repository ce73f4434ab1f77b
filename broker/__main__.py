import sys

from broker.entry import main

sys.exit(main())
