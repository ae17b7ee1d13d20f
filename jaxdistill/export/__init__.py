"""Export of a student's two towers as TFLite models (papers 000 and 001: the phone's image
indexer and query encoder): `tflite.py` (jax2tf -> TFLite converter, quantisation), `int8.py`
(the rewrites full-integer int8 needs),
`parity.py` (TFLite vs JAX embeddings and recall), `manifest.py` (signatures, versions,
checksums), `run.py` (`--mode=export`: checkpoint -> `<workdir>/export/`, atomically).
The exported files are used by `jaxdistill.search` without JAX or TensorFlow.
"""

from __future__ import annotations

from jaxdistill.errors import JaxDistillError


class ExportError(JaxDistillError, ValueError):
  """An export that cannot be done; the message names the cause and the fix."""
