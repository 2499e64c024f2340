"""DvD, Decoupled Vision-Language Deployment (paper §2.5, Figure 4): vision servers (`vision_server.py`) run
InternViT + projector (+ ViR router) and send features to a language server (`vision_client.py`, used by
`server.py`) over ZeroMQ, in the messages of `wire.py`."""
