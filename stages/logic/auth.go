package logic

import (
	"crypto"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/google/uuid"

	"imcloud/config"
)

// Identity is who an authenticated client is and what it listens to.
type Identity struct {
	Mid      int64
	Key      string
	Rooms    []string
	Platform string
	Accepts  []int32
}

// Claims are the JWT claims of a client token.
type Claims struct {
	Mid      int64    `json:"mid"`
	Key      string   `json:"key,omitempty"`
	Rooms    []string `json:"rooms,omitempty"`
	Platform string   `json:"platform,omitempty"`
	Accepts  []int32  `json:"accepts,omitempty"`
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
	_, err := jwt.ParseWithClaims(string(body), &c, func(*jwt.Token) (any, error) { return a.key, nil },
		jwt.WithValidMethods(a.methods), jwt.WithExpirationRequired(), jwt.WithLeeway(5*time.Second))
	if err != nil {
		return Identity{}, fmt.Errorf("%w: %w", ErrUnauthenticated, err)
	}
	return identity(c.Mid, c.Key, c.Rooms, c.Platform, c.Accepts)
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
	}
	if err := json.Unmarshal(body, &b); err != nil {
		return Identity{}, fmt.Errorf("%w: auth body is not goim JSON: %w", ErrUnauthenticated, err)
	}
	rooms := b.Rooms
	if b.RoomID != "" {
		rooms = append([]string{b.RoomID}, rooms...)
	}
	return identity(b.Mid, b.Key, rooms, b.Platform, b.Accepts)
}

func identity(mid int64, key string, rooms []string, platform string, accepts []int32) (Identity, error) {
	if mid <= 0 {
		return Identity{}, fmt.Errorf("%w: mid must be a positive integer", ErrUnauthenticated)
	}
	if key == "" {
		key = uuid.NewString()
	}
	return Identity{Mid: mid, Key: key, Rooms: rooms, Platform: platform, Accepts: accepts}, nil
}

// IssueToken signs an HS256 client token for the claims, valid for ttl.
func IssueToken(secret string, c Claims, ttl time.Duration) (string, error) {
	if secret == "" {
		return "", errors.New("no jwt secret configured (logic.auth.jwt_secret or --key)")
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
