"""Reading and writing torch-saved (`.pt`) files at the byte level.

- `index_pt(path)`: the object tree of a torch file with every tensor as a `TensorRecord` (dtype,
  shape, stride, storage byte range), from the zip central directory and the pickle alone: no
  tensor data is read (index.py).
- `index_safetensors(path)`: the same records from a safetensors header (safetensors_index.py).
- `MappedFile(path).tensor(record)` / `read_tensor(fd, record)`: one tensor, zero-copy from a
  mapping or copied once with pread; `copy_range(...)`: bytes file to file in the kernel (ranges.py).
- `PtWriter(path, tree)` / `save(tree, path)`: stream a file that equals torch.save's byte for
  byte; tensors planned as `Slot`s are written later in any order, from any thread, and source
  records are copied without being read (writer.py, zipformat.py).
"""

from neoxconv.ptio.index import PtIndex, StorageRecord, TensorRecord, index_pt
from neoxconv.ptio.safetensors_index import index_safetensors
from neoxconv.ptio.ranges import MappedFile, copy_range, read_tensor
from neoxconv.ptio.writer import FileRange, PtWriter, Slot, save

__all__ = ["FileRange", "MappedFile", "PtIndex", "PtWriter", "Slot", "StorageRecord", "TensorRecord", "copy_range",
           "index_pt", "index_safetensors", "read_tensor", "save"]
