#!/usr/bin/env python3
"""A registryfacade.SpecProvider server written the way another team would write one: Python
stubs generated from proto/ with grpcio-tools at start, answering GetImageSpec from a JSON file
{ "<id>": <ImageSpec in protobuf-JSON> } (the format of the facade's fixedSpecFN).

The end-to-end tests start it to show that a spec server not written with tonic works unchanged.

    spec_server.py --proto-dir proto --specs specs.json [--listen 127.0.0.1:0] [--workdir DIR]

Prints one line `listening on HOST:PORT` on stdout once serving; logs each call on stderr.
"""

import argparse
import json
import os
import signal
import sys
import tempfile
from concurrent import futures


def generate(proto_dir, out_dir):
    from grpc_tools import protoc

    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        os.path.join(proto_dir, "imagespec.proto"),
        os.path.join(proto_dir, "provider.proto"),
    ]
    if protoc.main(args) != 0:
        sys.exit(f"protoc failed on {proto_dir}")
    sys.path.insert(0, out_dir)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--proto-dir", required=True)
    ap.add_argument("--specs", required=True)
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--workdir", default=None, help="where the generated stubs go (default: a temp dir)")
    args = ap.parse_args()

    out_dir = tempfile.mkdtemp(prefix="spec-stubs-", dir=args.workdir)
    generate(os.path.abspath(args.proto_dir), out_dir)

    import grpc
    from google.protobuf import json_format

    import imagespec_pb2
    import provider_pb2
    import provider_pb2_grpc

    with open(args.specs) as f:
        specs = {i: json_format.ParseDict(s, imagespec_pb2.ImageSpec()) for i, s in json.load(f).items()}

    class SpecProvider(provider_pb2_grpc.SpecProviderServicer):
        def GetImageSpec(self, request, context):
            spec = specs.get(request.id)
            if spec is None:
                print(f"GetImageSpec id={request.id!r} -> NOT_FOUND", file=sys.stderr, flush=True)
                context.abort(grpc.StatusCode.NOT_FOUND, f"no workspace {request.id!r}")
            print(f"GetImageSpec id={request.id!r} -> ok", file=sys.stderr, flush=True)
            return provider_pb2.GetImageSpecResponse(spec=spec)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    provider_pb2_grpc.add_SpecProviderServicer_to_server(SpecProvider(), server)
    host, _, _ = args.listen.rpartition(":")
    port = server.add_insecure_port(args.listen)
    if port == 0:
        sys.exit(f"cannot listen on {args.listen}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    print(f"listening on {host}:{port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
