// Package token verifies what a client sends to authenticate (a signed
// JWT, or goim's plain JSON in insecure-json mode) and turns it into an
// Identity, and signs client tokens. It is the one place token claims
// are read and written: logic verifies with it, and imcloud token, the
// load generator and the tests sign with it, so they cannot drift.
package token

import (
	"crypto"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/google/uuid"

	"imcloud/pipeline/config"
	"imcloud/proto/wire"
)

// Identity is who an authenticated client is and what it listens to.
type Identity struct {
	Mid   int64
	Key   string
	Rooms []string // joined at connect
	// RoomGrants are the rooms claim's patterns ("live://*"): op 12 may
	// join a room they match, or one of Rooms.
	RoomGrants []string
	// AnyRoom lets op 12 join any room and AnyAccept op 14 subscribe any
	// operation: goim's behaviour, kept in insecure-json mode.
	AnyRoom   bool
	AnyAccept bool
	Platform  string
	Accepts   []int32
	// KeyMade says Key was made up here, the client naming none: such a
	// guest can be limited by nothing it sent.
	KeyMade bool
	// Recover: the client opted in to positioned delivery, recovery and
	// acks (issue 12; the `recover` claim). Without it the client gets
	// goim's frames byte for byte.
	Recover bool
}

// Claims are the JWT claims of a client token.
type Claims struct {
	Mid      int64    `json:"mid"`
	Key      string   `json:"key,omitempty"`
	Rooms    []string `json:"rooms,omitempty"`
	Platform string   `json:"platform,omitempty"`
	Accepts  []int32  `json:"accepts,omitempty"`
	// Recover opts the client in to positioned delivery, recovery and
	// acks (README, "Positioned delivery, recovery and acks").
	Recover bool `json:"recover,omitempty"`
	jwt.RegisteredClaims
}

// ErrUnauthenticated is returned for every token that does not verify; the
// wrapped detail is for logs, never for the client.
var ErrUnauthenticated = errors.New("unauthenticated")

// Authenticator turns a client's auth packet body into an Identity.
type Authenticator interface {
	Authenticate(body []byte) (Identity, error)
}

// NewAuthenticator builds the authenticator cfg.Mode names.
func NewAuthenticator(cfg config.Auth) (Authenticator, error) {
	switch cfg.Mode {
	case config.AuthInsecureJSON:
		return insecureJSON{}, nil
	case config.AuthJWT:
		if cfg.JWTPublicKeyFile != "" {
			pem, err := os.ReadFile(cfg.JWTPublicKeyFile)
			if err != nil {
				return nil, fmt.Errorf("read logic.auth.jwt_public_key_file: %w", err)
			}
			key, method, err := parsePublicKey(pem)
			if err != nil {
				return nil, fmt.Errorf("logic.auth.jwt_public_key_file %s: %w", cfg.JWTPublicKeyFile, err)
			}
			return jwtAuth{key: key, methods: []string{method}}, nil
		}
		if cfg.JWTSecret == "" {
			return nil, errors.New("logic.auth.jwt_secret: required in jwt mode")
		}
		return jwtAuth{key: []byte(cfg.JWTSecret), methods: []string{jwt.SigningMethodHS256.Alg()}}, nil
	default:
		return nil, fmt.Errorf("logic.auth.mode %q: unknown", cfg.Mode)
	}
}

func parsePublicKey(pem []byte) (crypto.PublicKey, string, error) {
	if k, err := jwt.ParseRSAPublicKeyFromPEM(pem); err == nil {
		return k, jwt.SigningMethodRS256.Alg(), nil
	}
	if k, err := jwt.ParseECPublicKeyFromPEM(pem); err == nil {
		return k, jwt.SigningMethodES256.Alg(), nil
	}
	return nil, "", errors.New("not an RSA or ECDSA public key in PEM form")
}

type jwtAuth struct {
	key     any
	methods []string
}

func (a jwtAuth) Authenticate(body []byte) (Identity, error) {
	var c Claims
	tok := string(body)
	_, err := jwt.ParseWithClaims(tok, &c, func(*jwt.Token) (any, error) { return a.key, nil },
		jwt.WithValidMethods(a.methods), jwt.WithExpirationRequired(), jwt.WithLeeway(5*time.Second))
	if err != nil {
		return Identity{}, fmt.Errorf("%w: %w", ErrUnauthenticated, err)
	}
	// Checked once the signature verified: an unsigned token costs no
	// more than before.
	if err := strictToken(tok); err != nil {
		return Identity{}, fmt.Errorf("%w: %w", ErrUnauthenticated, err)
	}
	id, err := identity(c.Mid, c.Key, c.Rooms, c.Platform, c.Accepts, false)
	id.Recover = c.Recover
	return id, err
}

// insecureJSON trusts goim's plain JSON auth body as is.
type insecureJSON struct{}

func (insecureJSON) Authenticate(body []byte) (Identity, error) {
	var b struct {
		Mid      int64    `json:"mid"`
		Key      string   `json:"key"`
		RoomID   string   `json:"room_id"`
		Rooms    []string `json:"rooms"`
		Platform string   `json:"platform"`
		Accepts  []int32  `json:"accepts"`
		Recover  bool     `json:"recover"`
	}
	if err := json.Unmarshal(body, &b); err != nil {
		return Identity{}, fmt.Errorf("%w: auth body is not goim JSON: %w", ErrUnauthenticated, err)
	}
	rooms := b.Rooms
	if b.RoomID != "" {
		rooms = append([]string{b.RoomID}, rooms...)
	}
	// goim lets a client join any room and subscribe any operation.
	id, err := identity(b.Mid, b.Key, rooms, b.Platform, b.Accepts, true)
	id.Recover = b.Recover
	return id, err
}

// identity checks the claims as the wire accepts them, so that no string
// a registry, a log line or a protobuf message cannot take gets past auth:
// an invalid claim refuses the token (4401). A token (jwt) names a user,
// mid > 0; goim's JSON (goim) also admits its guests, mid 0, whom goim's
// API pushes to by mid 0 (/goim/push/mids?mids=0).
func identity(mid int64, key string, rooms []string, platform string, accepts []int32, goim bool) (Identity, error) {
	switch {
	case goim && mid < 0:
		return Identity{}, fmt.Errorf("%w: mid must be 0 (a guest) or a positive integer", ErrUnauthenticated)
	case !goim && mid <= 0:
		return Identity{}, fmt.Errorf("%w: mid must be a positive integer", ErrUnauthenticated)
	}
	generated := key == ""
	if generated {
		key = uuid.NewString()
	} else if err := wire.ValidKey(key); err != nil {
		return Identity{}, fmt.Errorf("%w: %w", ErrUnauthenticated, err)
	}
	if err := wire.ValidPlatform(platform); err != nil {
		return Identity{}, fmt.Errorf("%w: %w", ErrUnauthenticated, err)
	}
	if len(rooms) > wire.MaxClaimRooms {
		return Identity{}, fmt.Errorf("%w: %d rooms, at most %d", ErrUnauthenticated, len(rooms), wire.MaxClaimRooms)
	}
	if len(accepts) > wire.MaxClaimAccepts {
		return Identity{}, fmt.Errorf("%w: %d accepts, at most %d", ErrUnauthenticated, len(accepts), wire.MaxClaimAccepts)
	}
	id := Identity{Mid: mid, Key: key, Platform: platform, Accepts: accepts, AnyRoom: goim, AnyAccept: goim, KeyMade: generated}
	for _, r := range rooms {
		if r == "" {
			continue // goim's empty room_id: no room
		}
		if err := wire.ValidRoomGrant(r); err != nil {
			return Identity{}, fmt.Errorf("%w: %w", ErrUnauthenticated, err)
		}
		if wire.IsRoomPattern(r) {
			id.RoomGrants = append(id.RoomGrants, r)
		} else {
			id.Rooms = append(id.Rooms, r)
		}
	}
	return id, nil
}

// Sign signs an HS256 client token for the claims, valid for ttl.
func Sign(secret string, c Claims, ttl time.Duration) (string, error) {
	if secret == "" {
		return "", errors.New("no jwt secret configured: set logic.auth.jwt_secret (e.g. IMCLOUD_LOGIC__AUTH__JWT_SECRET in the environment)")
	}
	now := time.Now()
	c.IssuedAt = jwt.NewNumericDate(now)
	c.ExpiresAt = jwt.NewNumericDate(now.Add(ttl))
	s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, c).SignedString([]byte(secret))
	if err != nil {
		return "", fmt.Errorf("sign token: %w", err)
	}
	return s, nil
}
