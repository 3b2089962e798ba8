package logic

import (
	"crypto/sha256"
	"fmt"
	"sync/atomic"

	"imcloud/pipeline/config"
	"imcloud/stages/logic/token"
)

// What SIGHUP may change without a restart (issue 14): the API keys, the
// client-token keys and the browser origins, so that each can be rotated
// while connections stay up. A request or a handshake reads them once,
// whole, from an atomic pointer; Reload swaps them whole.

// access is what an HTTP request is checked against.
type access struct {
	keys [][sha256.Size]byte // logic.api_keys, hashed; empty: no key needed
	cors []string            // logic.cors_origins
}

func newAccess(cfg config.Logic) *access {
	return &access{keys: hashKeys(cfg.APIKeys), cors: cfg.CORSOrigins}
}

// swapAuth is a token.Authenticator whose keys Reload replaces: a
// connection authenticated with the old ones stays; the next handshake
// uses the new.
type swapAuth struct{ p atomic.Pointer[authBox] }

type authBox struct{ token.Authenticator }

func newSwapAuth(a token.Authenticator) *swapAuth {
	s := &swapAuth{}
	s.p.Store(&authBox{a})
	return s
}

func (s *swapAuth) Authenticate(body []byte) (token.Identity, error) {
	return s.p.Load().Authenticate(body)
}

// Reload applies the reloadable part of cfg: API keys, CORS origins and
// the client-token secret or public key (its file read again). The
// authentication mode cannot change (a restart). Nothing changes if the
// new keys cannot be read.
func (st *Stage) Reload(cfg config.Logic) error {
	if cfg.Auth.Mode != st.cfg.Auth.Mode {
		return fmt.Errorf("logic.auth.mode %q → %q: needs a restart", st.cfg.Auth.Mode, cfg.Auth.Mode)
	}
	auth, err := token.NewAuthenticator(cfg.Auth)
	if err != nil {
		return fmt.Errorf("logic: reload client-token keys: %w", err)
	}
	st.auth.p.Store(&authBox{auth})
	st.access.Store(newAccess(cfg))
	return nil
}
