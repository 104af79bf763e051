"""`python conversion/hf_to_flax.py HF_DIR OUT_DIR [...]` == `mstar convert hf-to-flax HF_DIR OUT_DIR [...]`."""

import sys

from mstar_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-flax", *sys.argv[1:]]))
