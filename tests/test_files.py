"""Atomic writes, streaming safetensors I/O, and torch checkpoints loaded without running pickled code."""

import collections
import errno

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file as torch_load_file

from esd_jax.files import (SafetensorsReader, atomic_path, is_disk_full, load_torch_checkpoint, np_dtype,
                           write_safetensors)


def _tensors():
  rng = np.random.default_rng(0)
  return {'w': rng.standard_normal((3, 5)).astype(np.float32), 'b': rng.standard_normal(7).astype(ml_dtypes.bfloat16),
          'ids': np.arange(4, dtype=np.int64), 'h': rng.standard_normal((2, 2)).astype(np.float16)}


def test_written_file_reads_back_exactly_in_torch_and_ours(tmp_path):
  tensors = _tensors()
  write_safetensors(tmp_path / 'x.safetensors', tensors, metadata={'format': 'pt'})
  ref = torch_load_file(tmp_path / 'x.safetensors')
  assert ref['b'].dtype == torch.bfloat16 and ref['h'].dtype == torch.float16
  assert np.array_equal(ref['w'].numpy(), tensors['w'])
  with SafetensorsReader(tmp_path / 'x.safetensors') as reader:
    assert reader.metadata == {'format': 'pt'}
    assert set(reader) == set(tensors)
    for k, v in tensors.items():
      assert reader[k]().dtype == v.dtype and np.array_equal(reader[k]().view(np.uint8), v.view(np.uint8))


@pytest.mark.parametrize('name', ['fp16', 'bf16', 'fp32'])
def test_dtype_conversion_touches_only_floats(tmp_path, name):
  write_safetensors(tmp_path / 'x.safetensors', _tensors(), dtype=np_dtype(name))
  with SafetensorsReader(tmp_path / 'x.safetensors') as reader:
    assert reader['ids']().dtype == np.int64
    assert {reader[k]().dtype for k in ('w', 'b', 'h')} == {np.dtype(np_dtype(name))}


def test_unknown_dtype_name():
  with pytest.raises(ValueError, match="Unknown dtype 'fp8'"):
    np_dtype('fp8')


def test_truncated_and_garbage_files_name_the_file(tmp_path):
  write_safetensors(tmp_path / 'x.safetensors', _tensors())
  data = (tmp_path / 'x.safetensors').read_bytes()
  (tmp_path / 'cut.safetensors').write_bytes(data[:-10])
  (tmp_path / 'junk.safetensors').write_bytes(b'not a safetensors file at all')
  for name in ('cut', 'junk'):
    with pytest.raises(ValueError, match=f'{name}.safetensors: not a readable safetensors file'):
      SafetensorsReader(tmp_path / f'{name}.safetensors')
  with pytest.raises(FileNotFoundError, match='missing.safetensors: weights file not found'):
    SafetensorsReader(tmp_path / 'missing.safetensors')


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
  write_safetensors(tmp_path / 'x.safetensors', {'a': np.ones(2, np.float32)})
  before = (tmp_path / 'x.safetensors').read_bytes()
  with pytest.raises(TypeError, match='cannot write tensor of dtype'):
    write_safetensors(tmp_path / 'x.safetensors', {'a': np.ones(2, np.float32), 'z': np.array(['s'])})
  assert (tmp_path / 'x.safetensors').read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['x.safetensors']


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
  out = tmp_path / 'pipe'
  with atomic_path(out) as tmp:
    tmp.mkdir()
    (tmp / 'a.txt').write_text('one')
  with pytest.raises(RuntimeError):
    with atomic_path(out) as tmp:
      tmp.mkdir()
      (tmp / 'b.txt').write_text('two')
      raise RuntimeError('interrupted')
  assert [p.name for p in out.iterdir()] == ['a.txt']
  with atomic_path(out) as tmp:
    tmp.mkdir()
    (tmp / 'b.txt').write_text('two')
  assert [p.name for p in out.iterdir()] == ['b.txt']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['pipe']


class _Settings:
  """A Python object of the kind training scripts pickle next to their weights."""


class _StateDict(collections.OrderedDict):
  """A dict subclass: unpickling it means running this module's code."""


@pytest.mark.parametrize('obj, name', [({'conv_in.weight': torch.zeros(2), 'args': _Settings()}, '_Settings'),
                                       (_StateDict({'conv_in.weight': torch.zeros(2)}), '_StateDict')],
                         ids=['custom-object', 'dict-subclass'])
@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_pickled_objects_are_refused_with_only_safe_advice(tmp_path, obj, name, legacy):
  path = tmp_path / 'untrusted.pt'
  torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
  with pytest.raises(ValueError) as caught:
    load_torch_checkpoint(path)
  message = str(caught.value)
  assert message.startswith(f'{path}: holds pickled Python objects besides tensors '
                            f'(such as tests.test_files.{name})')
  assert 'does not execute pickled code' in message and '.safetensors version' in message
  assert 'weights_only=False' not in message and 'will likely succeed' not in message
  # torch's advice does not ride along in the traceback either.
  assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_full_disk_is_named_with_the_path_and_the_fix(tmp_path):
  target = tmp_path / 'out.json'
  target.write_text('old')
  with pytest.raises(OSError, match=r'Writing .*out\.json failed \(No space left on device\); nothing was written '
                                    r'there\. The disk is full'):
    with atomic_path(target) as tmp:
      tmp.write_text('new')
      raise OSError(errno.ENOSPC, 'No space left on device')
  assert target.read_text() == 'old' and [p.name for p in tmp_path.iterdir()] == ['out.json']
  # orbax (tensorstore) reports a full disk as RESOURCE_EXHAUSTED, wrapped in other errors.
  try:
    try:
      raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "/x/d/0.ocdbt"')
    except ValueError as e:
      raise RuntimeError('checkpoint save failed') from e
  except RuntimeError as wrapped:
    assert is_disk_full(wrapped)
  assert not is_disk_full(RuntimeError('shapes differ')) and not is_disk_full(OSError(errno.EACCES, 'denied'))
