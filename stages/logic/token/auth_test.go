package token

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"imcloud/pipeline/config"
)

func writePublicKey(t *testing.T, pub any) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func sign(t *testing.T, method jwt.SigningMethod, key any, c Claims) string {
	t.Helper()
	s, err := jwt.NewWithClaims(method, c).SignedString(key)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestAuthenticate(t *testing.T) {
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rsaFile := writePublicKey(t, &rsaKey.PublicKey)
	ecFile := writePublicKey(t, &ecKey.PublicKey)
	valid := Claims{Mid: 7, Key: "k", Rooms: []string{"live://1"}, Accepts: []int32{1000},
		RegisteredClaims: jwt.RegisteredClaims{ExpiresAt: jwt.NewNumericDate(time.Now().Add(time.Hour))}}
	noExp := valid
	noExp.ExpiresAt = nil
	hs, _ := Sign("secret", Claims{Mid: 7, Key: "k", Rooms: []string{"live://1"}, Accepts: []int32{1000}}, time.Hour)

	tests := []struct {
		name  string
		cfg   config.Auth
		body  string
		ok    bool
		rooms []string
	}{
		{"hs256", config.Auth{Mode: "jwt", JWTSecret: "secret"}, hs, true, []string{"live://1"}},
		{"hs256 wrong secret", config.Auth{Mode: "jwt", JWTSecret: "other"}, hs, false, nil},
		{"no expiry", config.Auth{Mode: "jwt", JWTSecret: "secret"}, sign(t, jwt.SigningMethodHS256, []byte("secret"), noExp), false, nil},
		{"rs256", config.Auth{Mode: "jwt", JWTPublicKeyFile: rsaFile}, sign(t, jwt.SigningMethodRS256, rsaKey, valid), true, []string{"live://1"}},
		{"es256", config.Auth{Mode: "jwt", JWTPublicKeyFile: ecFile}, sign(t, jwt.SigningMethodES256, ecKey, valid), true, []string{"live://1"}},
		// A token signed with HS256 using the public key as the secret must
		// not pass where an asymmetric key is configured.
		{"alg confusion", config.Auth{Mode: "jwt", JWTPublicKeyFile: rsaFile}, hs, false, nil},
		{"goim json", config.Auth{Mode: "insecure-json"}, `{"mid":7,"key":"k","room_id":"live://1","platform":"web","accepts":[1000]}`, true, []string{"live://1"}},
		{"goim json with a negative mid", config.Auth{Mode: "insecure-json"}, `{"mid":-1,"key":"k","room_id":"live://1"}`, false, nil},
		{"goim json malformed", config.Auth{Mode: "insecure-json"}, `{"mid":`, false, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, err := NewAuthenticator(tt.cfg)
			if err != nil {
				t.Fatal(err)
			}
			id, err := a.Authenticate([]byte(tt.body))
			if !tt.ok {
				if !errors.Is(err, ErrUnauthenticated) {
					t.Fatalf("err = %v, want ErrUnauthenticated", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if id.Mid != 7 || id.Key != "k" || !slices.Equal(id.Rooms, tt.rooms) || !slices.Equal(id.Accepts, []int32{1000}) {
				t.Fatalf("identity = %+v", id)
			}
		})
	}
}

func TestEmptyKeyGetsOne(t *testing.T) {
	a, _ := NewAuthenticator(config.Auth{Mode: "insecure-json"})
	id1, _ := a.Authenticate([]byte(`{"mid":1}`))
	id2, _ := a.Authenticate([]byte(`{"mid":1}`))
	if id1.Key == "" || id1.Key == id2.Key {
		t.Fatalf("generated keys %q and %q, want distinct non-empty", id1.Key, id2.Key)
	}
}

// TestGoimGuestsAuthenticate: goim's guests connect with mid 0 (or none),
// and goim's API pushes to them by it; insecure-json admits them, where
// main refused every one with 4401. A jwt token still names a user.
func TestGoimGuestsAuthenticate(t *testing.T) {
	goim, _ := NewAuthenticator(config.Auth{Mode: "insecure-json"})
	for _, body := range []string{`{"mid":0,"key":"g","room_id":"live://1"}`, `{"key":"g","room_id":"live://1"}`} {
		id, err := goim.Authenticate([]byte(body))
		if err != nil || id.Mid != 0 || id.Key != "g" || !slices.Equal(id.Rooms, []string{"live://1"}) {
			t.Fatalf("insecure-json %s: identity %+v, err %v; want guest g in live://1", body, id, err)
		}
	}
	jwtAuth, _ := NewAuthenticator(config.Auth{Mode: "jwt", JWTSecret: "secret"})
	for _, mid := range []int64{0, -1} {
		tok, _ := Sign("secret", Claims{Mid: mid, Key: "g"}, time.Hour)
		if _, err := jwtAuth.Authenticate([]byte(tok)); !errors.Is(err, ErrUnauthenticated) {
			t.Fatalf("jwt with mid %d: err = %v, want ErrUnauthenticated", mid, err)
		}
	}
}

// TestRecoverClaim: a client opts in to positioned delivery with the
// `recover` claim, or "recover": true in goim's JSON; nothing else opts
// it in, and a claim spelled in another case is refused like any other.
func TestRecoverClaim(t *testing.T) {
	jwtAuth, err := NewAuthenticator(config.Auth{Mode: config.AuthJWT, JWTSecret: "secret"})
	if err != nil {
		t.Fatal(err)
	}
	goim, _ := NewAuthenticator(config.Auth{Mode: config.AuthInsecureJSON})
	signed := func(c Claims) []byte {
		s, err := Sign("secret", c, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return []byte(s)
	}
	exp := time.Now().Add(time.Hour).Unix()
	cases := []struct {
		name        string
		a           Authenticator
		body        []byte
		ok, recover bool
	}{
		{"jwt with the claim", jwtAuth, signed(Claims{Mid: 3, Recover: true}), true, true},
		{"jwt without it", jwtAuth, signed(Claims{Mid: 3}), true, false},
		{"jwt with it false", jwtAuth, []byte(signRaw(t, "secret", `{"alg":"HS256","typ":"JWT"}`, fmt.Sprintf(`{"mid":3,"recover":false,"exp":%d}`, exp))), true, false},
		{"jwt in another case", jwtAuth, []byte(signRaw(t, "secret", `{"alg":"HS256","typ":"JWT"}`, fmt.Sprintf(`{"mid":3,"Recover":true,"exp":%d}`, exp))), false, false},
		{"jwt twice", jwtAuth, []byte(signRaw(t, "secret", `{"alg":"HS256","typ":"JWT"}`, fmt.Sprintf(`{"mid":3,"recover":false,"recover":true,"exp":%d}`, exp))), false, false},
		{"jwt not a bool", jwtAuth, []byte(signRaw(t, "secret", `{"alg":"HS256","typ":"JWT"}`, fmt.Sprintf(`{"mid":3,"recover":"yes","exp":%d}`, exp))), false, false},
		{"goim json with it", goim, []byte(`{"mid":3,"key":"k","recover":true}`), true, true},
		{"goim json without it", goim, []byte(`{"mid":3,"key":"k"}`), true, false},
		{"goim json not a bool", goim, []byte(`{"mid":3,"key":"k","recover":1}`), false, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			id, err := c.a.Authenticate(c.body)
			if (err == nil) != c.ok {
				t.Fatalf("Authenticate: err %v, want ok %v", err, c.ok)
			}
			if err != nil && !errors.Is(err, ErrUnauthenticated) {
				t.Fatalf("err %v is not ErrUnauthenticated", err)
			}
			if c.ok && id.Recover != c.recover {
				t.Fatalf("Recover %v, want %v", id.Recover, c.recover)
			}
		})
	}
}
