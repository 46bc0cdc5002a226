from tests.factories import Citizen, sign_in


async def test_sign_in_and_me(client, issuer):
    session = await sign_in(client, issuer, Citizen())
    response = await client.get("/v1/me", headers=session.headers)
    assert response.status_code == 200
    assert response.json()["personal_id"] == session.user["personal_id"]
