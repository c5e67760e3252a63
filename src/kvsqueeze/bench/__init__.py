"""The offline long-context benchmark: generated tasks (tasks/), user datasets, the runner, metrics and the report."""
