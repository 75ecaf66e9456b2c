"""Generated gRPC modules (see `moe_serving.grpc_codegen`)."""
