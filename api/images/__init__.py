"""Image intake: every image a request carries is pulled into the object store (fetched
by the API behind an SSRF guard, verified by Pillow, content-addressed) before the job is
accepted; the job keeps references only (storage/content.py)."""

from api.images.intake import ImageIntake, ImageLimits, ingest_image, ingest_parts

__all__ = ["ImageIntake", "ImageLimits", "ingest_image", "ingest_parts"]
