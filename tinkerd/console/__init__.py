"""Static assets of the web console (served by tinkerd/api/console.py)."""
