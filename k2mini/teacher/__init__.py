"""The teacher pass (``k2mini teacher``) and the cache it writes, which ``k2mini heal`` reads."""

from k2mini.teacher.cache import TeacherBatch, TeacherCache, TeacherManifest

__all__ = ["TeacherBatch", "TeacherCache", "TeacherManifest"]
