"""Sans-IO HBONE: HTTP/2 CONNECT tunnels over mutual TLS, as bytes in and events out."""
