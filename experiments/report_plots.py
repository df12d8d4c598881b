"""The report's figure: moved to `kdjax.report.plots` (re-exported here for old imports)."""

from kdjax.report.plots import (_quality, draw_figure, mean_curve, place_labels,  # pylint: disable=unused-import
                                plot_report, row_curves)
