"""Convert a llama2.c checkpoint into a Hugging Face folder (same as `smedjan convert llama2c ...`).

python convert/llama2c.py --checkpoint stories260K.bin --tokenizer tok512.bin --output stories260K-hf/
"""

import sys

from smedjan.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "llama2c", *sys.argv[1:]]))
