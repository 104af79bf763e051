"""`python conversion/flax_to_hf.py CKPT_DIR OUT_DIR [...]` == `mstar convert flax-to-hf CKPT_DIR OUT_DIR [...]`."""

import sys

from mstar_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "flax-to-hf", *sys.argv[1:]]))
