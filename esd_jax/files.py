"""Safe file plumbing for every converter: atomic writes and streaming safetensors I/O.

Nothing is ever half-written: outputs go to a temporary name in the target's folder and are renamed into
place only when complete (a rename within one filesystem is atomic). safetensors files are written one
tensor at a time, so exporting an 860M-parameter UNet never needs a second full copy in host memory, and
read lazily through `safe_open`, one tensor at a time.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import zipfile
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

# numpy dtype → safetensors dtype code.
SAFETENSORS_DTYPES = {
    np.dtype(np.float64): 'F64', np.dtype(np.float32): 'F32', np.dtype(np.float16): 'F16',
    np.dtype(ml_dtypes.bfloat16): 'BF16', np.dtype(np.int64): 'I64', np.dtype(np.int32): 'I32',
    np.dtype(np.int16): 'I16', np.dtype(np.int8): 'I8', np.dtype(np.uint8): 'U8', np.dtype(np.bool_): 'BOOL',
}

DTYPES = {'fp32': np.float32, 'float32': np.float32, 'fp16': np.float16, 'float16': np.float16,
          'bf16': ml_dtypes.bfloat16, 'bfloat16': ml_dtypes.bfloat16}



class LazyTensor:
  """A tensor read on demand: calling it (or np.asarray) returns the array; `shape` and `dtype` are known
  without reading it, so headers can be written and configs inferred before any data is loaded."""

  __slots__ = ('shape', 'dtype', '_load')

  def __init__(self, load: Callable[[], Any], shape: tuple[int, ...], dtype):
    self._load = load
    self.shape = tuple(shape)
    self.dtype = np.dtype(dtype)

  @classmethod
  def of(cls, value) -> Any:
    """`value` itself if it is an array or a LazyTensor; a plain zero-argument callable is read once to
    learn its shape and dtype (and again when used)."""
    if not callable(value) or isinstance(value, LazyTensor):
      return value
    probe = np.asarray(value())
    return cls(value, probe.shape, probe.dtype)

  def __call__(self) -> np.ndarray:
    return np.asarray(self._load())

  def __array__(self, dtype=None, copy=None):
    array = self()
    return array if dtype is None else array.astype(dtype, copy=False)

  def __repr__(self):
    return f'LazyTensor(shape={self.shape}, dtype={self.dtype})'


def tensor_summary(name: str, x) -> bytes:
  """What a weights fingerprint hashes of one tensor, cheaply: its name, shape, float64 sum and sum of squares."""
  x = np.asarray(x, np.float64)
  return f'{name}:{x.shape}:{x.sum():.17g}:{np.square(x).sum():.17g};'.encode()


def np_dtype(name: str | None):
  """numpy dtype for an export dtype name (None keeps each tensor's own dtype)."""
  if name is None:
    return None
  if name not in DTYPES:
    raise ValueError(f'Unknown dtype {name!r}; choose one of {sorted(set(DTYPES))}.')
  return DTYPES[name]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary sibling of `path` to write to; renames it over `path` on success.

  Works for files and directories. On any error the temporary is removed and `path` is untouched.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent))
  target = tmp / path.name  # a fresh name inside the temp dir: the caller may create a file or a folder
  try:
    yield target
    _fsync(target)
    if path.is_dir() and not path.is_symlink():
      old = Path(tempfile.mkdtemp(prefix=f'.{path.name}.', suffix='.old', dir=path.parent))
      os.replace(path, old / path.name)  # a folder cannot be renamed over another: move the old one aside
      os.replace(target, path)
      shutil.rmtree(old)
    else:
      os.replace(target, path)
  except OSError as e:
    if str(path) in str(e):
      raise
    hint = ' The disk is full: free space there, or write elsewhere.' if is_disk_full(e) else ''
    message = f'Writing {path} failed ({e.strerror or e}); nothing was written there.{hint}'
    raise (OSError(message) if e.errno is None else OSError(e.errno, message)) from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def says_disk_full(text: str) -> bool:
  """Whether an error's text says the disk or quota is full (orbax/tensorstore: RESOURCE_EXHAUSTED)."""
  return any(words in text for words in ('RESOURCE_EXHAUSTED', 'No space left on device', 'Disk quota exceeded'))


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` (or an exception it was raised from) says the disk or quota is full."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or says_disk_full(str(error)):
      return True
    error = error.__cause__ or error.__context__
  return False


def _fsync(path: Path) -> None:
  for p in [path] if path.is_file() else [q for q in path.rglob('*') if q.is_file()]:
    with open(p, 'rb') as f:
      os.fsync(f.fileno())


def parse_json(text: str, source: str, expected: type = dict, error: type[Exception] = ValueError):
  """`text` as JSON of type `expected`; otherwise `error` naming `source`."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise error(f'{source}: not valid JSON ({e}).') from e
  if not isinstance(value, expected):
    raise error(f'{source}: expected a JSON {"object" if expected is dict else "list"}, got '
                f'{type(value).__name__}.')
  return value


def read_json(path: Path) -> dict[str, Any]:
  if not path.is_file():
    raise FileNotFoundError(f'{path}: not found. A diffusers model folder needs it; is {path.parent} the '
                            'right folder?')
  return parse_json(path.read_text(), str(path))


def write_json(path: str | os.PathLike, obj: Any) -> None:
  with atomic_path(path) as tmp:
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + '\n')


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], *,
                      metadata: Mapping[str, str] | None = None, dtype=None) -> None:
  """Writes `tensors` (key → numpy or device array) as a .safetensors file, one tensor at a time.

  Floating tensors are converted to `dtype` (None keeps each tensor's own). Device arrays are copied to
  host one at a time, so the file is never held twice in memory.
  """
  def target(arr) -> np.dtype:
    dt = np.dtype(arr.dtype)
    floating = np.issubdtype(dt, np.floating) or dt == ml_dtypes.bfloat16
    dt = np.dtype(dtype) if dtype is not None and floating else dt
    if dt not in SAFETENSORS_DTYPES:
      raise TypeError(f'{path}: cannot write tensor of dtype {dt} to safetensors.')
    return dt

  header, offset, keys = {}, 0, sorted(tensors)
  for key in keys:
    dt, shape = target(tensors[key]), tuple(tensors[key].shape)
    size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    header[key] = {'dtype': SAFETENSORS_DTYPES[dt], 'shape': list(shape), 'data_offsets': [offset, offset + size]}
    offset += size
  if metadata:
    header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
  with atomic_path(path) as tmp, open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for key in keys:
      arr = np.asarray(tensors[key])
      f.write(np.ascontiguousarray(arr.astype(target(arr), copy=False)).tobytes())


class SafetensorsReader(Mapping):
  """Lazy, read-only view of one or more .safetensors files: key → zero-argument callable → np.ndarray.

  Opening checks each file's header (missing, not safetensors, truncated → an error naming the file).
  Use as a context manager so the files are closed after loading.
  """

  def __init__(self, paths: list[str | os.PathLike] | str | os.PathLike):
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    self._stack = contextlib.ExitStack()
    self._where: dict[str, Any] = {}
    self.metadata: dict[str, str] = {}
    for path in paths:
      path = Path(path)
      if not path.is_file():
        raise FileNotFoundError(f'{path}: weights file not found.')
      try:
        handle = self._stack.enter_context(safe_open(str(path), framework='np'))
      except (SafetensorError, OSError) as e:
        self._stack.close()
        raise ValueError(f'{path}: not a readable safetensors file ({e}). The file is corrupt or truncated '
                         '(an interrupted download or copy?): fetch or export it again.') from e
      self.metadata.update(handle.metadata() or {})
      for key in handle.keys():
        self._where[key] = (path, handle)

  def __getitem__(self, key: str) -> Callable[[], np.ndarray]:
    path, handle = self._where[key]

    def load():
      try:
        return handle.get_tensor(key)
      except SafetensorError as e:
        raise ValueError(f'{path}: cannot read tensor {key!r} ({e}); the file is corrupt.') from e
    return load

  def __iter__(self):
    return iter(self._where)

  def __len__(self):
    return len(self._where)

  def close(self):
    self._stack.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()



def is_torch_file(path: Path) -> bool:
  """A torch.save file: a zip archive, or the legacy format (a protocol-2 pickle of its magic number)."""
  with open(path, 'rb') as f:
    legacy = f.read(3) == b'\x80\x02\x8a'
  return legacy or zipfile.is_zipfile(path)


def load_torch_checkpoint(path: Path, what: str = 'Reading a pickled PyTorch checkpoint'):
  """What torch.save wrote to `path`, with tensors only (weights_only=True): pickled code never runs.

  Needs torch (an ImportError names the file otherwise); a corrupt or non-tensor pickle is a ValueError.
  The state dict may sit under 'state_dict', as Lightning and CompVis save it.
  """
  try:
    import torch
  except ImportError as e:
    raise ImportError(f'{path}: {what} needs PyTorch (pip install torch); the .safetensors format does not '
                      '(convert the file on a machine that has torch).') from e
  if not is_torch_file(path):
    raise ValueError(f'{path}: not a readable PyTorch checkpoint (neither a zip archive nor a legacy torch '
                     'pickle). The file is corrupt or truncated (an interrupted download?), or not a checkpoint.')
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True, mmap=zipfile.is_zipfile(path))
  except pickle.UnpicklingError as e:
    # torch's own text suggests weights_only=False, which runs the file's code: not advice to pass on about
    # a file of unknown origin. Only the name of the global it refused is kept (and not chained: `from None`).
    found = re.search(r'GLOBAL ([\w.]+)', str(e))
    refused = f' (such as {found[1]})' if found else ''
    raise ValueError(f'{path}: holds pickled Python objects besides tensors{refused}. esd-jax does not execute '
                     'pickled code, so it does not load this file. The safe route is a .safetensors version of '
                     'these weights; or convert this file to .safetensors with a trusted tool, on a machine where '
                     "you trust the file's origin (loading it there runs its pickled code).") from None
  except Exception as e:
    raise ValueError(f'{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}). The file is '
                     'corrupt or truncated.') from e
  if isinstance(obj, Mapping) and isinstance(obj.get('state_dict'), Mapping):
    obj = obj['state_dict']
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path}: holds a {type(obj).__name__}, not a state dict.')
  return obj


def torch_array(t) -> np.ndarray:
  """A torch tensor as numpy (bf16 reinterpreted as ml_dtypes' bfloat16, which numpy lacks)."""
  import torch
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()
