"""Reports: the report.json schema, figures, HTML and Markdown renderers."""
