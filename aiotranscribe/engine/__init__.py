"""Code that runs where the model lives (a worker process, or the thread executor).

Nothing here imports aiohttp or the server; results are plain Python data.
"""
