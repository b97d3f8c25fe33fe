"""A small CLIP BPE tokenizer of our own, loadable by `transformers.CLIPTokenizer`.

No machine here can download CLIP's 49k-token vocabulary, and small models need a small vocabulary anyway.
`write_clip_tokenizer` builds CLIP's byte-level alphabet (every text still tokenizes, letter by letter at
worst) plus BPE merges that make each given word a single token, and writes the tokenizer folder
(vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) as CLIP's tokenizer would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from esd_jax.files import atomic_path
from esd_jax.log import log

BOS, EOS = '<|startoftext|>', '<|endoftext|>'


def _bytes_to_unicode() -> dict[int, str]:
  """CLIP's reversible byte → printable character table (the same as GPT-2's)."""
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
               + list(range(ord('®'), ord('ÿ') + 1)))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
  """CLIP's BPE on one whitespace-free lowercase word (its last symbol carries '</w>')."""
  parts = list(word[:-1]) + [word[-1] + '</w>']
  while len(parts) > 1:
    pairs = [(ranks.get((a, b), float('inf')), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
    rank, first = min(pairs)
    if rank == float('inf'):
      break
    a, b = parts[first], parts[first + 1]
    merged, i = [], 0
    while i < len(parts):
      if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
        merged.append(a + b)
        i += 2
      else:
        merged.append(parts[i])
        i += 1
    parts = merged
  return parts


def clip_vocabulary(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Vocabulary and merges in which each of `words` (lowercase, no spaces) is one token."""
  alphabet = list(_bytes_to_unicode().values())
  words = sorted({w.lower() for w in words})
  if any(not w or any(c.isspace() for c in w) for w in words):
    raise ValueError('Tokenizer words must be non-empty and contain no whitespace.')
  merges: list[tuple[str, str]] = []
  ranks: dict[tuple[str, str], int] = {}
  # Appending a merge of a word's first two remaining pieces strictly shortens it and never undoes an
  # earlier merge, so repeating until every word is one piece terminates.
  changed = True
  while changed:
    changed = False
    for word in words:
      parts = _bpe(word, ranks)
      if len(parts) > 1:
        ranks[(parts[0], parts[1])] = len(merges)
        merges.append((parts[0], parts[1]))
        changed = True
  tokens = alphabet + [c + '</w>' for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS]
  vocab = {}
  for token in tokens:
    vocab.setdefault(token, len(vocab))
  return vocab, merges


def write_clip_tokenizer(folder: str | os.PathLike, words: Iterable[str], *, model_max_length: int = 77) -> None:
  """Writes a CLIPTokenizer folder whose vocabulary makes each of `words` a single token."""
  vocab, merges = clip_vocabulary(words)
  config = {
      'tokenizer_class': 'CLIPTokenizer', 'model_max_length': model_max_length, 'do_lower_case': True,
      'bos_token': BOS, 'eos_token': EOS, 'unk_token': EOS, 'pad_token': EOS, 'errors': 'replace',
      'add_prefix_space': False, 'clean_up_tokenization_spaces': True,
  }
  with atomic_path(folder) as tmp:
    tmp.mkdir()
    (tmp / 'vocab.json').write_text(json.dumps(vocab, ensure_ascii=False))
    (tmp / 'merges.txt').write_text('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
    (tmp / 'tokenizer_config.json').write_text(json.dumps(config, indent=2))
    (tmp / 'special_tokens_map.json').write_text(json.dumps(
        {'bos_token': BOS, 'eos_token': EOS, 'unk_token': EOS, 'pad_token': EOS}, indent=2))


def tokenize(tokenizer, prompts: list[str]):
  """Token ids padded to the tokenizer's max length, as Stable Diffusion pipelines feed the text encoder."""
  return tokenizer(prompts, padding='max_length', max_length=tokenizer.model_max_length, truncation=True,
                   return_tensors='np').input_ids


def warn_if_cut(tokenizer, prompts: list[str]) -> None:
  """Logs each prompt that `tokenize` cuts: one longer than the text encoder reads."""
  limit = tokenizer.model_max_length
  for prompt, ids in zip(prompts, tokenizer(list(prompts), truncation=False, verbose=False).input_ids):
    if len(ids) > limit:
      log.warning('The prompt %r is %d tokens longer than the text encoder reads (%d tokens): the end is cut.',
                  prompt, len(ids) - limit, limit)


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
  """Saves a CLIPTokenizer readable by every transformers version.

  transformers 5 writes only tokenizer.json; older versions' (slow) CLIPTokenizer, which diffusers
  pipelines name in model_index.json, needs vocab.json and merges.txt. Both are derived from the BPE model
  inside tokenizer.json.
  """
  folder = Path(folder)
  tokenizer.save_pretrained(str(folder))
  model = json.loads((folder / 'tokenizer.json').read_text())['model']
  merges = [m if isinstance(m, str) else ' '.join(m) for m in model['merges']]
  (folder / 'vocab.json').write_text(json.dumps(model['vocab'], ensure_ascii=False))
  (folder / 'merges.txt').write_text('#version: 0.2\n' + ''.join(m + '\n' for m in merges))
