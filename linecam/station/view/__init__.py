"""``linecam view``: the live page (app.py: routes; live.py: MQTT state and fan-out; page.html)."""
