ITEMS = [{"sku": "MUG-001", "quantity": 2, "name": "Mug"}]


def test_shipment_is_accepted_once_per_key(sandbox):
    first = sandbox.post("/v1/shipments", {"order_id": 12, "items": ITEMS}, key="ship-order-12")
    replay = sandbox.post("/v1/shipments", {"order_id": 12, "items": ITEMS}, key="ship-order-12")
    other = sandbox.post("/v1/shipments", {"order_id": 13, "items": ITEMS}, key="ship-order-12")

    assert first.status_code == 201, first.text
    shipment = first.json()
    assert shipment["id"].startswith("shp_")
    assert shipment["status"] == "accepted"
    assert shipment["items"] == ITEMS
    assert (replay.status_code, replay.json(), replay.headers["Idempotent-Replayed"]) == (201, shipment, "true")
    assert other.status_code == 422
    assert sandbox.get("/v1/shipments", order_id=12).json()["data"] == [shipment]
    assert sandbox.get(f"/v1/shipments/{shipment['id']}").json() == shipment
    assert sandbox.summary()["shipments"] == {"total": 1, "by_order_id": {"12": 1}, "orders_shipped_more_than_once": []}


def test_lost_shipment_response_is_recovered_by_retrying_with_the_key(sandbox):
    sandbox.set_faults(fail_after_shipment_next=1)

    lost = sandbox.post("/v1/shipments", {"order_id": 5, "items": ITEMS}, key="ship-order-5")
    retry = sandbox.post("/v1/shipments", {"order_id": 5, "items": ITEMS}, key="ship-order-5")

    assert lost.status_code == 500
    assert retry.status_code == 201
    assert retry.json()["id"] == sandbox.get("/v1/shipments", order_id=5).json()["data"][0]["id"]
    assert sandbox.summary()["shipments"]["total"] == 1
