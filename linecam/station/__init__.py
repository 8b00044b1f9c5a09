"""The operator station: everything that runs beside the line, never in the daemon.

- :mod:`linecam.station.store`: the record database (SQLAlchemy Core; SQLite or PostgreSQL).
- :mod:`linecam.station.recorder`: ``linecam record``, MQTT -> database, acked after commit.
- :mod:`linecam.station.history`: ``linecam history``, queries and NG rate per hour.
- :mod:`linecam.station.view`: ``linecam view``, the live web page (Starlette + SSE).
- :mod:`linecam.station.ask`: ``linecam ask``, questions about a stored defect to the VLM bundle.
"""
