"""``file:`` URLs and plain paths: nothing to move (a shared file system)."""
from __future__ import annotations

from parsl.data_provider.files import File
from parsl.data_provider.staging import Staging
from parsl.utils import RepresentationMixin


class NoOpFileStaging(Staging, RepresentationMixin):
    """Accepts ``file`` scheme inputs and outputs and leaves them where they are."""

    def can_stage_in(self, file: File) -> bool:
        return file.scheme == "file"

    def can_stage_out(self, file: File) -> bool:
        return file.scheme == "file"
