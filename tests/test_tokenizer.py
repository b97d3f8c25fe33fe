"""Our CLIP BPE tokenizer, as transformers.CLIPTokenizer loads it."""

import pytest
from transformers import CLIPTokenizer

from esd_jax.tokenizer import BOS, EOS, tokenize, write_clip_tokenizer

WORDS = ['a', 'an', 'red', 'green', 'blue', 'yellow', 'circle', 'square', 'triangle', 'cross', 'ed', 'reddish']


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  folder = tmp_path_factory.mktemp('tok') / 'tokenizer'
  write_clip_tokenizer(folder, WORDS, model_max_length=12)
  return CLIPTokenizer.from_pretrained(str(folder))


def test_every_word_is_one_token(tokenizer):
  for word in WORDS:
    assert tokenizer.tokenize(word) == [word + '</w>']
    assert tokenizer.tokenize(word.upper()) == [word + '</w>']  # CLIP lowercases


def test_unknown_text_falls_back_to_characters(tokenizer):
  assert tokenizer.tokenize('zebra!') == ['z', 'e', 'b', 'r', 'a</w>', '!</w>']
  assert tokenizer.unk_token_id not in tokenizer('zebra!').input_ids[1:-1]


def test_padded_ids_like_the_sd_pipeline(tokenizer):
  ids = tokenize(tokenizer, ['a red circle', ''])
  bos, eos = tokenizer.convert_tokens_to_ids([BOS, EOS])
  assert ids.shape == (2, 12)
  assert list(ids[0, :5]) == [bos, *tokenizer.convert_tokens_to_ids(['a</w>', 'red</w>', 'circle</w>']), eos]
  assert list(ids[1]) == [bos] + [eos] * 11


def test_bad_words_rejected(tmp_path):
  with pytest.raises(ValueError, match='no whitespace'):
    write_clip_tokenizer(tmp_path / 't', ['red circle'])
