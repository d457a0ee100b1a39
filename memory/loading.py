"""One lock for building torch models in this process.

transformers' `from_pretrained` changes process-wide state while it builds a model: the default dtype, weight
tying, and torch's init and creation functions patched for the meta device. A model built on another thread
meanwhile comes out broken: the REPL's first recall loaded the sentence embedder while the model thread loaded
the LM, and the LM's tied head then had no data ("The tensor has a non-zero number of elements, but its data is
not allocated yet"). Every model, adapter and embedder Rapport builds is built under this lock, one at a time.
"""

from __future__ import annotations

import threading

BUILD_LOCK = threading.RLock()  # re-entrant: a build may build another (an adapter on its base model)
