"""llmrec pipeline stages: plain Python, runnable from the CLI or from Airflow tasks."""

__version__ = "0.1.0"
