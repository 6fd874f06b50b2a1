"""Generated protobuf/gRPC stubs; only pyserve.protocol.codec and the servicer import them."""
