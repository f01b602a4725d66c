// Greedy generation with onnxruntime-web over smedjan's ONNX export (KV cache in/out, one token a step).
"use strict";

async function loadModel(base) {
  const [tj, tc, cfg] = await Promise.all(
    ["tokenizer.json", "tokenizer_config.json", "config.json"].map(f => fetch(base + f).then(r => r.json())));
  ort.env.wasm.wasmPaths = new URL("vendor/", location.href).href;
  ort.env.wasm.numThreads = 1;  // threads need cross-origin isolation, which a plain static host lacks
  const session = await ort.InferenceSession.create(base + "onnx/model.onnx", { executionProviders: ["wasm"] });
  return { session, tok: new ByteLevelBPE(tj, tc), cfg };
}

async function generate(model, prompt, maxNewTokens) {
  const { session, tok, cfg } = model;
  const L = cfg.num_hidden_layers, hkv = cfg.num_key_value_heads, hd = cfg.head_dim || cfg.hidden_size / cfg.num_attention_heads;
  let ids = tok.encode(prompt);
  const promptIds = ids;
  let past = {};
  for (let i = 0; i < L; i++)
    for (const k of ["key", "value"]) past[`past_key_values.${i}.${k}`] = new ort.Tensor("float32", new Float32Array(0), [1, hkv, 0, hd]);
  let pastLen = 0;
  const out = [];
  const eos = [].concat(cfg.eos_token_id ?? [], tok.eosId ?? []);
  for (let step = 0; step < maxNewTokens && pastLen + ids.length <= cfg.max_position_embeddings; step++) {
    const n = ids.length, total = pastLen + n;
    const feeds = {
      input_ids: new ort.Tensor("int64", BigInt64Array.from(ids.map(BigInt)), [1, n]),
      attention_mask: new ort.Tensor("int64", new BigInt64Array(total).fill(1n), [1, total]),
      position_ids: new ort.Tensor("int64", BigInt64Array.from({ length: n }, (_, j) => BigInt(pastLen + j)), [1, n]),
      ...past,
    };
    const res = await session.run(feeds);
    const V = cfg.vocab_size, logits = res.logits.data, off = (n - 1) * V;
    let best = 0;
    for (let v = 1; v < V; v++) if (logits[off + v] > logits[off + best]) best = v;
    if (eos.includes(best)) break;
    out.push(best);
    for (let i = 0; i < L; i++)
      for (const k of ["key", "value"]) past[`past_key_values.${i}.${k}`] = res[`present.${i}.${k}`];
    pastLen = total;
    ids = [best];
  }
  return { promptIds, ids: out, text: tok.decode(out) };
}
