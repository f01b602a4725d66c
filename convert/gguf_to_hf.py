"""Read a GGUF file back into a Hugging Face folder (same as `smedjan convert gguf FILE --output DIR`).

python convert/gguf_to_hf.py model.gguf --output model-hf/
"""

import sys

from smedjan.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "gguf", *sys.argv[1:]]))
