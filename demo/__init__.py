"""The captioner web demo: one page and a JSON API on the standard library's HTTP server.

Run it with `python demo/app.py`; demo/app.py lists what each module does.
"""
