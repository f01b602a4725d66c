"""The browser demo (demo/): headless Chromium runs the page with onnxruntime-web, and its greedy
headline equals smedjan's, token for token. Runs where `chromium` is installed (.ci/install-browser)."""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import transformers

from smedjan.checkpoint import load_hf
from smedjan.infer.runner import generate

DEMO = Path(__file__).resolve().parents[1] / "demo"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/install-browser)"),
]


@pytest.fixture(scope="module")
def site():
    if not (DEMO / "vendor" / "ort.wasm.min.js").is_file():
        if shutil.which("npm") is None or subprocess.run([DEMO / "fetch_ort.sh"]).returncode:
            pytest.skip("onnxruntime-web not fetched (demo/fetch_ort.sh needs npm and the registry)")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(DEMO))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def page_dom(url: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=60000", "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240).stdout


@pytest.mark.parametrize("prompt", ["Scientists discover", "Why the"])
def test_page_writes_smedjans_greedy_headline(site, prompt):
    dom = page_dom(f"{site}/index.html?auto=1&max_new_tokens=24&prompt={quote(prompt)}")
    assert 'data-done="1"' in dom, dom[-2000:]
    page = json.loads(re.search(r'<pre id="ids"[^>]*>(.*?)</pre>', dom, re.S).group(1))
    model = DEMO / "model"
    tok = transformers.AutoTokenizer.from_pretrained(model)
    assert page["prompt"] == tok(prompt).input_ids  # the page's JS tokenizer
    cfg, params = load_hf(model, dtype=np.float32)
    want = generate(params, cfg, [page["prompt"]], max_new_tokens=24, temperature=0.0, eos_id=cfg.eos_token_id)[0]
    assert page["generated"] == want and len(want) > 3
    text = re.search(r'<div id="output">(.*?)</div>', dom, re.S).group(1)
    assert text.replace("&amp;", "&") == prompt + tok.decode(want)
