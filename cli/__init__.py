"""Thin Click front-ends over the dataprep, formats and trainer libraries."""
