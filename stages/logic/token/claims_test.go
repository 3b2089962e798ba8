package token

import (
	"encoding/base64"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"imcloud/pipeline/config"
)

// signRaw signs header and payload exactly as given with HS256.
func signRaw(t *testing.T, secret, header, payload string) string {
	t.Helper()
	enc := base64.RawURLEncoding
	signing := enc.EncodeToString([]byte(header)) + "." + enc.EncodeToString([]byte(payload))
	sig, err := jwt.SigningMethodHS256.Sign(signing, []byte(secret))
	if err != nil {
		t.Fatal(err)
	}
	return signing + "." + enc.EncodeToString(sig)
}

// TestJWTClaimsStrict: a signed token is read as its issuer wrote it.
// encoding/json matched claim names without regard to case and kept the
// last of a duplicated name: {"Rooms":["*"]} and a second "rooms" both
// granted every room. Such tokens, and one with a "crit" header, are now
// refused; the usual tokens still pass.
func TestJWTClaimsStrict(t *testing.T) {
	a, err := NewAuthenticator(config.Auth{Mode: config.AuthJWT, JWTSecret: "secret"})
	if err != nil {
		t.Fatal(err)
	}
	const hdr = `{"alg":"HS256","typ":"JWT"}`
	exp := time.Now().Add(time.Hour).Unix()
	cases := []struct {
		name, header, payload string
		ok                    bool
		rooms, grants         []string
	}{
		{name: "plain", header: hdr, payload: fmt.Sprintf(`{"mid":1,"rooms":["public://lobby"],"exp":%d}`, exp), ok: true, rooms: []string{"public://lobby"}},
		{name: "unknown claims kept", header: hdr, payload: fmt.Sprintf(`{"mid":1,"team":"x","Team":"y","exp":%d}`, exp), ok: true},
		{name: "claim name in another case", header: hdr, payload: fmt.Sprintf(`{"mid":1,"Rooms":["*"],"exp":%d}`, exp)},
		{name: "registered claim in another case", header: hdr, payload: fmt.Sprintf(`{"mid":1,"EXP":%d,"exp":%d}`, exp+1e6, exp)},
		{name: "claim name with Kelvin sign", header: hdr, payload: fmt.Sprintf(`{"mid":1,"\u212aey":"k","exp":%d}`, exp)},
		{name: "duplicated claim", header: hdr, payload: fmt.Sprintf(`{"mid":1,"rooms":["public://lobby"],"rooms":["*"],"exp":%d}`, exp)},
		{name: "duplicated mid", header: hdr, payload: fmt.Sprintf(`{"mid":1,"mid":2,"exp":%d}`, exp)},
		{name: "crit header", header: `{"alg":"HS256","typ":"JWT","crit":["b64"],"b64":false}`, payload: fmt.Sprintf(`{"mid":1,"exp":%d}`, exp)},
		{name: "duplicated header", header: `{"alg":"HS256","alg":"HS256"}`, payload: fmt.Sprintf(`{"mid":1,"exp":%d}`, exp)},
		{name: "duplicate spelled with an escape", header: hdr, payload: fmt.Sprintf(`{"mid":1,"rooms":["public://lobby"],"r\u006foms":["*"],"exp":%d}`, exp)},
		{name: "name in another case behind an escaped quote", header: hdr, payload: fmt.Sprintf(`{"mid":1,"note":"a\",\"Rooms\":1","Rooms":["*"],"exp":%d}`, exp)},
		{name: "repeats inside values are the value's own", header: hdr, ok: true, rooms: []string{"public://lobby"},
			payload: fmt.Sprintf(` { "mid" : 1 , "team" : {"rooms":1,"rooms":2,"x":[{"Rooms":3}]}, "s":"\"rooms\"", "rooms" : ["public://lobby"] , "exp" : %d } `, exp)},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			id, err := a.Authenticate([]byte(signRaw(t, "secret", c.header, c.payload)))
			if !c.ok {
				if !errors.Is(err, ErrUnauthenticated) {
					t.Fatalf("accepted (%+v, %v), want refused", id, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(id.Rooms, c.rooms) || !slices.Equal(id.RoomGrants, c.grants) || id.AnyRoom {
				t.Fatalf("identity %+v", id)
			}
		})
	}
	// Tokens Sign signs pass.
	tok, err := Sign("secret", Claims{Mid: 3, Key: "k", Rooms: []string{"live://*"}}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if id, err := a.Authenticate([]byte(tok)); err != nil || id.Mid != 3 || !slices.Equal(id.RoomGrants, []string{"live://*"}) {
		t.Fatalf("issued token: %+v, %v", id, err)
	}
}
