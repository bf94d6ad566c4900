"""edgeserve: many LLMs resident in one block-granular memory pool.

    from edgeserve import EdgeServer
    async with EdgeServer(models="models", device="cpu", pool_size="2GiB") as es:
        out = await es.chat("demo-llama", [{"role": "user", "content": "hi"}], max_tokens=32)
"""

from edgeserve.api import EdgeServer
from edgeserve.blocking import BlockingEdgeServer
from edgeserve.loader import LoadReport
from edgeserve.results import Completion, Delta, GenerationError, InvalidRequest, Usage

__all__ = ["BlockingEdgeServer", "Completion", "Delta", "EdgeServer", "GenerationError",
           "InvalidRequest", "LoadReport", "Usage"]
__version__ = "0.1.0"
