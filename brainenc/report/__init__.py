"""brainenc.report: per-ROI tables, voxel maps in subject space (NIfTI / MGH), figures and a
one-page summary (``index.md`` + ``index.html``), built from plain arrays.

Entry point: :func:`build_report` with :class:`ReportInputs` and :class:`ReportOptions`.
matplotlib and nilearn are imported only when a figure is drawn.
"""
from brainenc.report.brainit import (
    DecodeReportInputs,
    build_decode_report,
    cluster_figure,
    decode_table,
    transfer_figure,
    write_cluster_maps,
)
from brainenc.report.build import ReportInputs, ReportOptions, build_report
from brainenc.report.document import Document
from brainenc.report.maps import values_to_surface, values_to_volume, write_map
from brainenc.report.tables import markdown_table, roi_table, write_roi_table

__all__ = [
    "ReportInputs",
    "ReportOptions",
    "build_report",
    "Document",
    "write_map",
    "values_to_volume",
    "values_to_surface",
    "roi_table",
    "markdown_table",
    "write_roi_table",
    "DecodeReportInputs",
    "build_decode_report",
    "write_cluster_maps",
    "cluster_figure",
    "transfer_figure",
    "decode_table",
]
