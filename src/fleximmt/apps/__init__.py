"""What people use: the command line (``cli``), the web app (``app``), the rating app (``rate``) and the
ComfyUI node pack (``comfy``). Everything below is a library; these are its users."""
