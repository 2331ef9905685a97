"""Ask the served model about images from the command line (`llava_triton.client.main`, whose
--help lists the flags: one per input of the `llava` ensemble).

    python -m client --image cat.jpg --prompt "<image>\\nWhat is in the picture?" --url localhost:8001
"""

import sys

from llava_triton.client import main

if __name__ == "__main__":
    sys.exit(main())
