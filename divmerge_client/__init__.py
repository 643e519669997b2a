"""A small client for the DivMerge service (``from divmerge_client import Client``). It needs only httpx
(and pyyaml/tqdm for the command line): no engine, no torch."""

from .client import Client, ClientError

__all__ = ["Client", "ClientError"]
