"""python -m npllama.tasks download | list"""

import sys

from .download import main

if __name__ == "__main__":
    sys.exit(main())
