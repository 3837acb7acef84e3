"""Reports: headless matplotlib figures and a self-contained HTML summary of a run."""
