"""A client that has never seen our .proto: it discovers virtufin.WorkManager
through gRPC server reflection and calls it with dynamically built messages;
the standard health service answers SERVING."""
import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "virtufin.WorkManager"


def _dynamic(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(db)
    return db, pool


def _method(channel, pool, name):
    method = pool.FindServiceByName(SERVICE).FindMethodByName(name)
    req_cls = message_factory.GetMessageClass(method.input_type)
    resp_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        f"/{SERVICE}/{name}",
        request_serializer=req_cls.SerializeToString,
        response_deserializer=resp_cls.FromString,
    )
    return req_cls, call


def test_reflection_lists_the_service(service):
    with grpc.insecure_channel(service.grpc) as channel:
        db, pool = _dynamic(channel)
        services = set(db.get_services())
        assert SERVICE in services
        assert "grpc.health.v1.Health" in services
        methods = {m.name for m in pool.FindServiceByName(SERVICE).methods}
        assert {"CreateWorker", "ListWorkers", "InvokeWorker", "RecoverWorkers"} <= methods


def test_dynamic_create_and_list(service):
    with grpc.insecure_channel(service.grpc) as channel:
        _, pool = _dynamic(channel)
        list_req, list_workers = _method(channel, pool, "ListWorkers")
        assert len(list_workers(list_req()).workers) == 0

        create_req, create_worker = _method(channel, pool, "CreateWorker")
        req = create_req()
        req.code_source.content = b"def Process(event):\n    return {'type': 'out', 'data': event['data']}\n"
        req.mime_type = "text/x-python"
        req.topics.append("prices")
        req.tags["origin"] = "reflection"
        req.start = True
        worker_id = create_worker(req).id
        assert len(worker_id) == 36

        workers = list_workers(list_req()).workers
        assert [w.id for w in workers] == [worker_id]
        status_enum = pool.FindEnumTypeByName("virtufin.WorkerStatus")
        assert status_enum.values_by_number[workers[0].status].name == "WORKER_STATUS_RUNNING"
        assert workers[0].tags["origin"] == "reflection"

        # Bad input is INVALID_ARGUMENT with a usable message.
        bad = create_req()
        bad.code_source.content = b"def Process(event)\n"
        bad.mime_type = "text/x-python"
        bad.topics.append("prices")
        try:
            create_worker(bad)
            raise AssertionError("a syntax error was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "SyntaxError" in e.details()


def test_health_is_serving(service):
    with grpc.insecure_channel(service.grpc) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
