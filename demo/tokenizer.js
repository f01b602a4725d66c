// Byte-level BPE (GPT-2 style), enough of tokenizer.json to encode a prompt and decode the output
// exactly as smedjan's (HF `tokenizers`) tokenizer does for the models `smedjan tokenizer` trains.
"use strict";

function bytesToUnicode() {
  // GPT-2's reversible byte -> printable character table.
  const bs = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) { bs.push(b); cs.push(256 + n); n++; }
  }
  const enc = {}, dec = {};
  bs.forEach((b, i) => { enc[b] = String.fromCharCode(cs[i]); dec[String.fromCharCode(cs[i])] = b; });
  return [enc, dec];
}

// The split regex of GPT-2, which `tokenizers`' ByteLevel pre-tokenizer applies.
const SPLIT = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

class ByteLevelBPE {
  constructor(tokenizerJson, tokenizerConfig) {
    const model = tokenizerJson.model;
    this.vocab = model.vocab;
    this.idToToken = [];
    for (const [t, i] of Object.entries(this.vocab)) this.idToToken[i] = t;
    this.special = new Set();
    for (const t of tokenizerJson.added_tokens || []) {
      this.idToToken[t.id] = t.content;
      if (t.special) this.special.add(t.id);
    }
    this.ranks = new Map();
    model.merges.forEach((m, i) => this.ranks.set(Array.isArray(m) ? m.join(" ") : m, i));
    [this.byteEnc, this.byteDec] = bytesToUnicode();
    const bos = tokenizerConfig && tokenizerConfig.bos_token;
    this.bosId = bos === undefined ? null : this.vocab[bos] ?? (tokenizerJson.added_tokens || []).find(t => t.content === bos)?.id;
    const eos = tokenizerConfig && tokenizerConfig.eos_token;
    this.eosId = eos === undefined ? null : (tokenizerJson.added_tokens || []).find(t => t.content === eos)?.id ?? this.vocab[eos];
    this.cache = new Map();
  }

  bpe(word) {
    if (this.cache.has(word)) return this.cache.get(word);
    let parts = Array.from(word);
    while (parts.length > 1) {
      let best = -1, bestRank = Infinity;
      for (let i = 0; i < parts.length - 1; i++) {
        const r = this.ranks.get(parts[i] + " " + parts[i + 1]);
        if (r !== undefined && r < bestRank) { bestRank = r; best = i; }
      }
      if (best < 0) break;
      // merge every occurrence of the best pair, left to right, as `tokenizers` does
      const a = parts[best], b = parts[best + 1], merged = [];
      for (let i = 0; i < parts.length; i++) {
        if (i < parts.length - 1 && parts[i] === a && parts[i + 1] === b) { merged.push(a + b); i++; }
        else merged.push(parts[i]);
      }
      parts = merged;
    }
    const ids = parts.map(p => this.vocab[p]);
    this.cache.set(word, ids);
    return ids;
  }

  encode(text, addBos = true) {
    const ids = addBos && this.bosId != null ? [this.bosId] : [];
    const utf8 = new TextEncoder();
    for (const piece of text.match(SPLIT) || []) {
      const mapped = Array.from(utf8.encode(piece), b => this.byteEnc[b]).join("");
      ids.push(...this.bpe(mapped));
    }
    return ids;
  }

  decode(ids) {
    const bytes = [];
    for (const id of ids) {
      if (this.special.has(id)) continue;
      for (const ch of this.idToToken[id]) bytes.push(this.byteDec[ch]);
    }
    return new TextDecoder().decode(new Uint8Array(bytes));
  }
}
