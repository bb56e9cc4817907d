"""`python -m bot.soak`: see bot.soak.driver."""

import sys

from bot.soak.driver import main

sys.exit(main())
