"""The Gradio comparison demo (`visalign demo`): `app.py` serves it, `screenshot.py` drives it in Chromium."""
